"""Where numwatch sees training: hooks, patches, the GradScaler adapter, the clip observer and the forward probes."""
