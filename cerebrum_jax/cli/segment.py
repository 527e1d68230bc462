"""PLACEHOLDER: the 'segment' subcommand is being written; this file is replaced by its owner."""


def add_parser(sub):
    p = sub.add_parser("segment", help="(not yet available)")
    p.set_defaults(func=lambda args: 1)
