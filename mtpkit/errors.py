"""The base of every error whose message is meant for the user (printed without a traceback)."""


class MtpkitError(Exception):
    pass
