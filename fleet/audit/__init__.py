"""The fleet's audit log: an append-only hash chain of fleet actions, its heads signed by an online key.

    chain.py    the rules with no database: entries, their hash chain, signed heads, check_chain (verify)
    log.py      AuditLog: append (in the caller's transaction), the heads in the database and heads.log
"""
