"""quantgate's own quantizers, for methods no library in our dependency list provides."""
