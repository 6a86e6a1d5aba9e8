import sys

from embedserve.bench.cli import main

sys.exit(main())
