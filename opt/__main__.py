import os
import sys

from opt.cli import main
from opt.errors import REFUSED_EXIT

if __name__ == "__main__":
    if "TORCHELASTIC_ERROR_FILE" in os.environ:
        # Under torchrun, @record writes an uncaught exception's traceback to the file torchrun
        # reads back, so the launcher reports it with the failing rank. Imported only there:
        # it costs a second of torch import, which `opt data prepare` and its workers skip.
        from torch.distributed.elastic.multiprocessing.errors import record

        raise SystemExit(record(main)())
    code = main()
    if code == REFUSED_EXIT and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # A rank that refuses to start leaves at once: the interpreter's teardown can abort in
        # c10d's threads (seen on the store's host: "terminate called without an active
        # exception"), which would turn a refusal that no retry fixes into a crash that
        # `opt launch slurm` requeues.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    raise SystemExit(code)
