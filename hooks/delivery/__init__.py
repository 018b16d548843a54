"""Getting records off the training process: the HTTP transport, the on-disk spool, sync and the non-finite policy."""
