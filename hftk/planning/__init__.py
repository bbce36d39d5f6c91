"""`hftk plan`: the planner (planner), the alpha-beta scaling model (scaling), the short measured
probe (probe) and the tensor-parallel layout it reads off a meta-device model (tp_layout)."""
