"""Planning: the machine's facts and measured bandwidth, and the configuration that fits them."""
