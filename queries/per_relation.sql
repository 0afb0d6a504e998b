-- Per Wikidata relation: how many facts, and the best AIE of the last subject token and of
-- the last token per token × layer kind (the smallest for raw KL), to see which relations
-- the early and late sites carry; in the metric and on the scale that facts.sql's variables
-- set (a ratio of means over each relation's facts).
.read queries/facts.sql
WITH cells AS (
  SELECT c.kind, c.relation_id, c.category, c.layer,
         effect(avg(c.score), avg(a.high_score), avg(a.low_score)) AS aie,
         count(DISTINCT c.known_id) AS facts
  FROM categorized c JOIN averaged a USING (kind, known_id)
  WHERE c.category IN ('last_subject', 'last') AND c.head IS NULL
  GROUP BY ALL)
SELECT kind, relation_id, max(facts) AS facts,
       better() * max(better() * aie) FILTER (WHERE category = 'last_subject') AS best_aie_last_subject,
       arg_max(layer, better() * aie) FILTER (WHERE category = 'last_subject') AS layer_last_subject,
       better() * max(better() * aie) FILTER (WHERE category = 'last') AS best_aie_last_token,
       arg_max(layer, better() * aie) FILTER (WHERE category = 'last') AS layer_last_token
FROM cells GROUP BY kind, relation_id
ORDER BY kind, facts DESC, relation_id;
