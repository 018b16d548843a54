"""numwatch's collector service. Server code is imported lazily by the CLI, so
``numwatch sync`` works on a client-only install."""
