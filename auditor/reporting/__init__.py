"""What is made from a report: the HTML page, comparisons and CI gates."""
