-- Figure 3 (ROME's notebook causal_trace_frozen_mlp_attn.ipynb): per layer, the average
-- indirect effect at the last subject token of restoring one hidden state in the ordinary
-- run (`hidden`), with the attention severed and with the MLP severed, each minus the
-- ordinary run's mean low_score, over the facts averaged in every one of these kinds (so the
-- bars compare the same facts); as a ratio of means, divided by those facts' ATE. Equals
-- figure3.parquet of `coordinator aggregate`.
.read queries/facts.sql
WITH kinds AS (SELECT DISTINCT kind FROM averaged
               WHERE kind IN ('hidden', 'severed_attn', 'severed_mlp')),
     common_facts AS (SELECT known_id, any_value(high_score) AS high_score,
                             any_value(low_score) AS low_score
                      FROM averaged
                      WHERE kind IN (SELECT kind FROM kinds)
                      GROUP BY known_id
                      HAVING count(DISTINCT kind) = (SELECT count(*) FROM kinds)),
     low AS (SELECT avg(high_score) AS high, avg(low_score) AS low, count(*) AS facts
             FROM common_facts)
SELECT c.layer, c.kind, effect(avg(c.score), any_value(low.high), any_value(low.low)) AS aie,
       on_scale(avg(c.score), any_value(low.high), any_value(low.low)) AS mean,
       spread(stddev_pop(c.score), any_value(low.high), any_value(low.low)) AS std,
       count(*) AS n, metric_name() AS metric, scale_tag() AS scale
FROM categorized c JOIN common_facts USING (known_id), low
WHERE c.category = 'last_subject' AND c.kind IN (SELECT kind FROM kinds)
  AND 'hidden' IN (SELECT kind FROM kinds) AND (SELECT count(*) FROM kinds) >= 2
GROUP BY c.layer, c.kind
ORDER BY c.layer, CASE c.kind WHEN 'hidden' THEN 0 WHEN 'severed_attn' THEN 1 ELSE 2 END;
