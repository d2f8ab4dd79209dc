import sys

from embedrpc.cli import main

sys.exit(main())
