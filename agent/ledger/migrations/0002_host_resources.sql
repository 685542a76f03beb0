-- Schema version 2: slices may carry host CPU (milli-CPUs) and host memory (MiB), accounted
-- against the node's capacity less its system reserve.
ALTER TABLE slices ADD COLUMN cpu_milli INTEGER NOT NULL DEFAULT 0 CHECK (cpu_milli >= 0);
ALTER TABLE slices ADD COLUMN host_memory_mib INTEGER NOT NULL DEFAULT 0 CHECK (host_memory_mib >= 0);
