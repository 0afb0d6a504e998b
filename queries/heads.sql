-- The per-head maps: for the kinds whose rows carry a head (`head`), the average indirect
-- effect of restoring one head's output at the last subject token and at the last token,
-- per layer and head, over the averaged facts. Equals heads.parquet of `coordinator aggregate`.
.read queries/facts.sql
SELECT c.category, c.layer, c.head,
       avg(c.score) - l.low AS aie, avg(c.score) AS mean, stddev_pop(c.score) AS std,
       count(*) AS n
FROM categorized c
JOIN (SELECT kind, avg(low_score) AS low FROM averaged GROUP BY kind) l USING (kind)
WHERE c.head IS NOT NULL AND c.category IN ('last_subject', 'last')
GROUP BY c.category, c.row_order, c.layer, c.head, l.low
ORDER BY c.row_order, c.layer, c.head;
