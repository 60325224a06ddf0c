"""The fleet's audit log: an append-only hash chain of fleet actions, its heads signed by an online key.

    log.py      AuditLog: append (in the caller's transaction), the signed heads, heads.log, verify
"""
