"""`redline study`: settings compared against fp32's noise, and the report."""
