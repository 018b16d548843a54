"""Storage: the engine, the ORM models, packing, step blocks, rollups, retention and migrations."""
