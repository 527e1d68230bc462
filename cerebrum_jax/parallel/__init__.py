"""Many devices and processes: ``sharding`` (a device mesh), ``distributed`` (several processes), ``shares``
(which subjects each process reads)."""
