-- Figure 2: per kind (token × layer kinds; `heads.sql` has the per-head maps), token category
-- and layer, the average indirect effect (mean score minus the mean low_score of the averaged
-- facts), with the std (ddof 0) and rows behind it, in the metric and on the scale that
-- facts.sql's variables set. Equals summary.parquet of `coordinator aggregate`.
.read queries/facts.sql
SELECT c.kind, c.category, c.layer,
       effect(avg(c.score), l.high, l.low) AS aie, on_scale(avg(c.score), l.high, l.low) AS mean,
       spread(stddev_pop(c.score), l.high, l.low) AS std, count(*) AS n,
       metric_name() AS metric, scale_tag() AS scale
FROM categorized c
JOIN (SELECT kind, avg(high_score) AS high, avg(low_score) AS low FROM averaged GROUP BY kind) l
  USING (kind)
WHERE c.head IS NULL
GROUP BY c.kind, c.category, c.row_order, c.layer, l.high, l.low
ORDER BY c.kind, c.row_order, c.layer;
