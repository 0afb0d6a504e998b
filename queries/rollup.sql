-- Figure 2: per kind (token × layer kinds; `heads.sql` has the per-head maps), token category
-- and layer, the average indirect effect (mean score minus the mean low_score of the averaged
-- facts), with the std (ddof 0) and rows behind it. Equals summary.parquet of
-- `coordinator aggregate`.
.read queries/facts.sql
SELECT c.kind, c.category, c.layer,
       avg(c.score) - l.low AS aie, avg(c.score) AS mean,
       stddev_pop(c.score) AS std, count(*) AS n
FROM categorized c
JOIN (SELECT kind, avg(low_score) AS low FROM averaged GROUP BY kind) l USING (kind)
WHERE c.head IS NULL
GROUP BY c.kind, c.category, c.row_order, c.layer, l.low
ORDER BY c.kind, c.row_order, c.layer;
