"""`python -m nemo_anchored ...` (what torchrun launches): the same as `nemo-anchored ...`."""
from nemo_anchored.cli.main import main

if __name__ == "__main__":
    main()
