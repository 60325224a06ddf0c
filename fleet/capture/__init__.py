"""Captured field data: devices' uploads received and stored, pulled as datasets, labeled, retrained on.

    receiver.py  UploadReceiver: devices' capture uploads (edgeml.protocol.uploads) staged, checked, acknowledged
    store.py     CaptureArchive: content-addressed sample files plus the ``captures`` index, retention
    pull.py      pull() and list_captures(): the dataset folder ``edgeml fleet capture pull`` writes, the counts
    label.py     labels for a pulled dataset (an operator's CSV or a teacher model)
    retrain.py   ``edgeml fleet retrain``: pull, label, train, compile with the gate, publish the candidate
"""
