"""The errors a peer raises for what its user can fix, in a module without heavy imports (the CLI catches them)."""


class InitialPeersError(ConnectionError):
    """None of the initial peers could be reached."""


class ModelMismatchError(ValueError):
    """Another peer of the same run trains a model of a different shape."""


class DaemonStartError(RuntimeError):
    """The libp2p daemon could not start (e.g. an address in host_maddrs that this machine cannot bind)."""


class RoundCrashError(RuntimeError):
    """Averaging rounds crashed several times in a row for a reason other than the network (a bug): raised from
    the optimizer's step so that a run does not go on training alone while it looks healthy."""
