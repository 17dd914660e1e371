"""Git adapter: subprocess plumbing, pkt-line framing, the long-running filter, attributes, setup.

Everything that talks to git lives in this package; ``plumbing.Git`` is the only place that
starts a git subprocess.
"""
