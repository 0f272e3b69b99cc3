"""The durable spool (`ACK_MODE=durable`, DESIGN.md §10): a 2xx leaves only after the fsync that
covers every event of its request.

Invariants
- An open batch IS a spool file, `SPOOL_DIR/<owner>/<sink>/<partition>+<name>`: its name, partition
  and key are fixed when the batch opens, and its bytes are written once. Each group commit appends
  one complete gzip member (or zstd frame) holding the records of that group, so the file is a
  valid multi-member .jsonl.gz at every commit point, byte-identical to what the sink receives:
  delivered → the file is deleted; not delivered → it is renamed into the DLQ (no copy).
- Framing is the compression format's own: a member carries the CRC32 and length of its records
  (a zstd frame its checksum and size), so a torn tail — only bytes never acknowledged — is found
  at recovery, cut off and counted (`spool_torn_bytes_total`).
- Group commit: one committer task; each round writes every lane's new records (one member per
  open batch) and fdatasyncs them in threads, then answers every request whose records the round
  covered. Requests arriving while a round runs wait for the next one. No traffic, no writes.
- No 2xx before its round's fsync returned and the owner's lease was seen still held after it
  (a peer that adopted our spool renamed the lease directory first, and then read everything
  fsynced before that). A failed round answers 503 and takes its records back out of the batches.
- At start, spool files of dead owners (our own previous incarnations on this host at once,
  peers sharing the directory once their lease is older than SPOOL_ADOPT_AFTER) are claimed by
  renaming the owner's directory, cut at their last complete member and moved into the DLQ under
  their fixed names, before new traffic is batched; the replayer delivers them.
"""
