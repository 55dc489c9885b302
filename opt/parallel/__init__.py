from opt.parallel.dims import ParallelDims

__all__ = ["ParallelDims"]
