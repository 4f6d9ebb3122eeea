"""The one exception type for errors a user can cause and fix. The CLI prints its message (which
names the fix) without a traceback; everything else is a bug and keeps its traceback."""


class NanochatError(Exception):
    pass
