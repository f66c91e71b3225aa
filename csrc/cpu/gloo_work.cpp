// paracomm._C.abort_work(work): interrupt a thread blocked in a torch.distributed Work's wait().
//
// Why: the gloo CPU executor waits for each point-to-point transfer in Work.wait(), which only returns when the
// transfer completes, its timeout passes (gloo then closes the pair for good) or the work is aborted. torch
// binds neither Work::abort() nor a working ProcessGroupGloo::abort() (the backend's default is a no-op in
// torch 2.13), so paracomm's signature monitor (paracomm/_monitor.py), which runs on another thread and finds
// that the ranks called different collectives, binds it here. For gloo's SendWork / RecvWork, abort() calls
// UnboundBuffer::abortWaitSend / abortWaitRecv: the blocked wait() returns False at once (and so does any later
// wait() on that work); the posted transfer stays unmatched in its pair, which the caller then discards with
// the whole process group. Works of other kinds follow their backend's abort() (the base class's does nothing).
#include <pybind11/pybind11.h>
#include <torch/csrc/distributed/c10d/Work.hpp>
#include <torch/csrc/utils/pybind.h>

namespace paracomm {

void bind_gloo_work(pybind11::module_& m) {
  m.def(
      "abort_work",
      [](const c10::intrusive_ptr<c10d::Work>& work) {
        pybind11::gil_scoped_release no_gil;  // abort takes the buffer's mutex; the waiter holds no GIL
        work->abort();
      },
      pybind11::arg("work"),
      "Interrupt wait() on a torch.distributed Work (gloo send/recv: wait() returns False). Idempotent.");
}

}  // namespace paracomm
