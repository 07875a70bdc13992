"""Everything that depends on the number of devices: the mesh and the logical sharding rules."""
