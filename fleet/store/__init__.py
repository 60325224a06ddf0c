"""The registry's database: the schema (typed tables), its migrations, and the connection to it.

    schema.py      every table as a module-level SQLAlchemy object, and UTCDateTime (the only datetime type)
    db.py          Database: engine, transactions, migrations, errors translated to RegistryError
"""
