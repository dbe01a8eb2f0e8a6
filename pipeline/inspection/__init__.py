"""Reading an output directory for people: statistics, the HTML report, contact sheets, and verification."""
