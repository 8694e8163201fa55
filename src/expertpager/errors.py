"""The project's one exception type: every user-facing failure is an ExpertPagerError."""


class ExpertPagerError(Exception):
    """A problem with the user's input or environment, stated in one clear sentence."""
