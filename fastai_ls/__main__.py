import sys

from fastai_ls.cli import main

if __name__ == "__main__":
    sys.exit(main())
