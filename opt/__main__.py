import os

from opt.cli import main

if __name__ == "__main__":
    if "TORCHELASTIC_ERROR_FILE" in os.environ:
        # Under torchrun, @record writes an uncaught exception's traceback to the file torchrun
        # reads back, so the launcher reports it with the failing rank. Imported only there:
        # it costs a second of torch import, which `opt data prepare` and its workers skip.
        from torch.distributed.elastic.multiprocessing.errors import record

        raise SystemExit(record(main)())
    raise SystemExit(main())
