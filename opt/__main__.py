from torch.distributed.elastic.multiprocessing.errors import record

from opt.cli import main

if __name__ == "__main__":
    # Under torchrun, @record writes an uncaught exception's traceback to the file torchrun
    # reads back, so the launcher reports it with the failing rank.
    raise SystemExit(record(main)())
