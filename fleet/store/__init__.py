"""The registry's database: the schema (typed tables), its migrations, and the connection to it.

    db.py          Database: engine, transactions, migrations, errors translated to RegistryError
"""
