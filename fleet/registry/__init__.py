"""The signed registry on disk and how its files reach devices.

    repository.py   Registry: publish bundles as TUF targets, keys, root rotation, the database
    tuf_repo.py     the TUF rules with no I/O: build, change and sign the four top-level roles
    keys.py         key files: online keys in DIR/keys/, root keys in DIR/offline-keys/
    distribution.py DistributionService: repository files over MQTT (get requests, broadcast)
"""
