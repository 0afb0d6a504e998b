-- The per-head maps: for the kinds whose rows carry a head (`head`), the average indirect
-- effect of restoring one head's output at the last subject token and at the last token,
-- per layer and head, over the averaged facts, in the metric and on the scale that
-- facts.sql's variables set. Equals heads.parquet of `coordinator aggregate`.
.read queries/facts.sql
SELECT c.category, c.layer, c.head,
       effect(avg(c.score), l.high, l.low) AS aie, on_scale(avg(c.score), l.high, l.low) AS mean,
       spread(stddev_pop(c.score), l.high, l.low) AS std, count(*) AS n,
       metric_name() AS metric, scale_tag() AS scale
FROM categorized c
JOIN (SELECT kind, avg(high_score) AS high, avg(low_score) AS low FROM averaged GROUP BY kind) l
  USING (kind)
WHERE c.head IS NOT NULL AND c.category IN ('last_subject', 'last')
GROUP BY c.category, c.row_order, c.layer, c.head, l.high, l.low
ORDER BY c.row_order, c.layer, c.head;
