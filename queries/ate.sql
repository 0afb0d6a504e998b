-- Average total effect per token × layer kind: mean high_score − mean low_score over the
-- averaged facts, and the best AIE at the last subject token and at the last token, with
-- their layers (the largest; the smallest for raw KL, which falls toward the clean run), in
-- the metric and on the scale that facts.sql's variables set. Equals headline.json of
-- `coordinator aggregate`.
.read queries/facts.sql
WITH low AS (SELECT kind, count(*) AS facts, avg(high_score) AS high, avg(low_score) AS low
             FROM averaged GROUP BY kind),
cells AS (SELECT kind, category, layer, avg(score) AS mean FROM categorized
          WHERE category IN ('last_subject', 'last') AND head IS NULL GROUP BY ALL)
SELECT l.kind, l.facts, on_scale(l.high, l.high, l.low) AS high_score,
       on_scale(l.low, l.high, l.low) AS low_score, effect(l.high, l.high, l.low) AS ate,
       better() * max(better() * effect(c.mean, l.high, l.low))
         FILTER (WHERE c.category = 'last_subject') AS best_aie_last_subject,
       arg_max(c.layer, better() * effect(c.mean, l.high, l.low))
         FILTER (WHERE c.category = 'last_subject') AS best_layer_last_subject,
       better() * max(better() * effect(c.mean, l.high, l.low))
         FILTER (WHERE c.category = 'last') AS best_aie_last_token,
       arg_max(c.layer, better() * effect(c.mean, l.high, l.low))
         FILTER (WHERE c.category = 'last') AS best_layer_last_token,
       metric_name() AS metric, scale_tag() AS scale
FROM low l JOIN cells c USING (kind)
GROUP BY l.kind, l.facts, l.high, l.low
ORDER BY l.kind;
