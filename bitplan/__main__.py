"""`python -m bitplan` (and `torchrun ... -m bitplan`): the same command line as `bitplan`."""
from .cli import main

if __name__ == "__main__":
    main()
