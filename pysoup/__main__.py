import sys

from pysoup.cli import main

sys.exit(main())
