"""paracomm's benchmarks: ``python -m paracomm.bench {allreduce,kernels,ddp} --help``."""
