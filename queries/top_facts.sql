-- The facts with the strongest single restoration per kind: the highest score minus the
-- fact's own low_score, where (token, layer, and head for `head`) it happens, and the prompt.
.read queries/facts.sql
SELECT t.kind, f.known_id, f.prompt, f.answer,
       max(t.score) - f.low_score AS best_effect,
       arg_max(t.token, t.score) AS token, arg_max(t.layer, t.score) AS layer,
       arg_max(t.head, t.score) AS head,
       f.high_score, f.low_score
FROM traces t JOIN facts f USING (known_id)
WHERE f.traced AND (coalesce(getvariable('facts'), 'correct') = 'all' OR coalesce(f.correct, true))
GROUP BY t.kind, f.known_id, f.prompt, f.answer, f.high_score, f.low_score
QUALIFY row_number() OVER (PARTITION BY t.kind ORDER BY max(t.score) - f.low_score DESC) <= 20
ORDER BY t.kind, best_effect DESC;
