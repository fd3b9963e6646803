"""File formats and content, bytes and pixels; no training logic: `recordio` (MXNet RecordIO read and write),
`binfile` (InsightFace `.bin` verification pairs), `toyface` (the procedural toy benchmark), `degrade` (hand-crafted
degradation of face images)."""
