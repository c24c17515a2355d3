"""`evim3 serve`: a DICOM node that analyses every echo cine it receives and answers with a TID 1500
Structured Report (and, optionally, a secondary-capture image) sent to its destinations.

Modules, in the order a cine travels through them (no torch anywhere: the edge runtime only):

- ``config``: the node's settings, their one-line validation, ``--check``;
- ``scp``: the Storage/Verification SCP (pynetdicom), which acknowledges a C-STORE only once the dataset is
  durably in the spool (``spool``) and queued (``jobqueue``);
- ``jobqueue``: the persistent queue (SQLite, WAL): jobs received -> running -> done | skipped | failed, and
  per destination pending -> sent | dead;
- ``triage``: whether an instance is a cine the model can read, and why not;
- ``analyse``: the one adapter to the edge pipeline;
- ``sr`` / ``capture``: the Comprehensive SR (TID 1500, highdicom) and the secondary-capture image;
- ``send``: C-STORE to the destinations, exponential backoff with a cap, dead letter;
- ``http``: /health and /queue; ``audit``: the JSON-lines audit log (no patient data);
- ``node``: the worker threads, signals and restart semantics that tie them together.
"""
