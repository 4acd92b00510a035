"""Number formats (e4m3, e2m1, UE8M0), block quantisation, repacking and quantisation passes."""
