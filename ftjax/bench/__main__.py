"""`python -m ftjax.bench '<spec json>'`: one worker process (see `workers.worker_main`)."""

import sys

from .workers import worker_main

if __name__ == "__main__":
    worker_main(sys.argv)
