"""The one exception type the command line turns into a one-line message and exit status 2."""


class InputError(Exception):
    """Bad input from the user: a missing or corrupt file, a wrong shape, an unknown option.

    The message is one line and names the file (or option) and the problem, e.g.
    ``"scan.nii.gz: contains 12 NaN voxels"``.
    """

    def __init__(self, message: str, path=None):
        super().__init__(f"{path}: {message}" if path is not None else message)
