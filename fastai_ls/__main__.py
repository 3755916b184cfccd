import sys

from fastai_ls.cli import main

sys.exit(main())
