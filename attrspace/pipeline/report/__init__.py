"""The report of a run: results gathered from the stage folders (`results`), figures (`figures`),
shared table formatting (`tables`), and report.md itself (`document`)."""
