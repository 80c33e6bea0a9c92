r"""Reasoner replies in the styles real models write, with how each must be read.

Each entry: (reply text, expected kind, expected answer / question / malformed reason, expected ``ambiguous`` flag,
the style it imitates). Where the styles come from:

- DeepSeek-R1 distills: the updated chat templates end the prompt with ``<think>\n``, so the reply holds only
  ``</think>`` (deepseek-ai/DeepSeek-R1 issues 352, 456, 526; vllm-project/vllm issue 14028); reasoning opens with
  "Okay, so I ..." / "Alright, ..." and, when cut off by ``max_tokens``, never closes (DeepSeek-R1 issue 594);
  the model sometimes skips thinking with an empty ``<think>\n\n</think>`` (ollama issue 8837); reasoning often
  ends with ``**Final Answer**\n\boxed{..}`` before ``</think>``; the final section restates the solution with
  ``\[ \boxed{..} \]``.
- Qwen3: ``enable_thinking=False`` puts ``<think>\n\n</think>\n\n`` in front of the answer (QwenLM/Qwen3 issues
  1444, 1575; Qwen-Agent issue 542); answers use ``### Step`` headers, ``---`` rules, ``$$`` display maths.
- Qwen2.5 instruct: ``\( \)`` / ``\[ \]`` delimiters, "To determine ..., we ...", polite tails ("If you have any
  further questions or need more information, feel free to ask!"); Qwen2.5-Math's prompt "Please reason step by
  step, and put your final answer within \boxed{}" gives bare boxes.
- Llama-3.x instruct: Meta's evaluation format "## Step 1: ..." and "Therefore, the final answer is:
  $\boxed{answer}$. I hope it is correct."; Minerva-style "Final Answer: The final answer is $X$. I hope it is
  correct."
- Small instruct models (SmolLM2 135M-1.7B, Qwen2.5-0.5B): short, repeated, lowercase or truncated replies, echoes
  of the prompt.
- Gemma-2/3 instruct: bold labels ("**Answer:**", "**Explanation:**"), ``*`` bullets, "Let me know if you have
  any other questions!".
- Asking styles from clarification benchmarks (GSM-MC, arXiv 2507.23407: "So please provide: what is ...?").
"""

from collections import Counter

import pytest

from acrl.rollout.replies import parse_reply

SOLVED, ASK, BAD = "solved", "ask", "malformed"

CORPUS = [
    # --- DeepSeek-R1 distills ------------------------------------------------------------------------------------
    ("Okay, so I need to find the area of the triangle. The description says the base is 6 and the height is 8. "
     "The area is 1/2 * 6 * 8 = 24. That seems right.\n</think>\n\nSOLVED \\boxed{24}",
     SOLVED, "24", None, "R1 distill, <think> opened by the template: only </think> in the reply"),
    ("Alright, let me see. The legs are 3 and 4. Should I reply NEED MORE INFO? No, both legs are given, so the "
     "hypotenuse is 5.\n</think>\n\nSOLVED\n\nThe hypotenuse is \\( \\sqrt{3^2 + 4^2} = 5 \\).\n\n\\[\n\\boxed{5}\n\\]",
     SOLVED, "5", None, "R1 distill: keyword in the reasoning, display box in the final section"),
    ("Okay, the question asks for the sum of the red and blue bars. The blue bar is 4 but the red bar's height is "
     "never given. If it were 7 I could say SOLVED \\boxed{11}, but I can't know that.\n</think>\n\n"
     "NEED MORE INFO\nWhat is the height of the red bar?",
     ASK, "What is the height of the red bar?", None, "R1 distill: the other keyword only inside the reasoning"),
    ("<think>\nOkay, so the chart shows 3 apples on Monday and 5 on Tuesday. Total is 8.\n\n**Final Answer**\n"
     "\\boxed{8}\n</think>\n\n**SOLVED**\n\nThe total is 3 + 5 = 8.\n\n**Final Answer**\n\\boxed{8}",
     SOLVED, "8", None, "R1 distill with both tags: **Final Answer** in the reasoning and again after it"),
    ("Okay, so I have this problem about a bar chart. The description says the blue bar is 4 and the red bar is "
     "taller. I need to find the sum. Hmm, but how tall is the red bar? Maybe I need more info about that. Let me "
     "think again. The description says",
     BAD, "no_decision", None, "R1 distill cut off by max_tokens inside reasoning the template opened"),
    ("<think>\nOkay, let's see. The circle has radius 3, so the area is 9\u03c0. Wait, is the question asking for "
     "the circumference? Let me reread",
     BAD, "only_thinking", None, "R1 distill truncated inside its own <think> block"),
    ("<think>\nI could answer SOLVED \\boxed{12} or say NEED MORE INFO. The caption gives 12, so SOLVED.\n</think>\n\n",
     BAD, "only_thinking", None, "R1 distill: both keywords inside the reasoning, empty final section"),
    ("Alright, the rectangle is 4 by 6. SOLVED \\boxed{20}.\n</think>\n\nThe perimeter of the rectangle is "
     "2(4 + 6) = 20.",
     BAD, "no_decision", None, "R1 distill: the decision only inside the reasoning"),
    ("<think>\n\n</think>\n\nSOLVED \\boxed{36}",
     SOLVED, "36", None, "R1 distill skipping thinking (empty think block)"),
    ("Okay, 3 rows of 5 seats is 15 seats.\n</think>\n\nSOLVED \\boxed{15}\n\nIf you need more information about the "
     "chart, feel free to ask!",
     SOLVED, "15", None, "R1 distill with a polite tail"),
    ("Okay, 3 out of 4 sectors are shaded.\n</think>\n\n**Answer:** SOLVED \\boxed{\\frac{3}{4}}",
     SOLVED, "\\frac{3}{4}", None, "R1 distill: bold label, nested braces"),
    ("Okay, the square has side 4 and the circle inside it has radius 2.\n</think>\n\nSOLVED\n\nThe area of the "
     "shaded region is \\(\\boxed{16 - 4\\pi}\\).",
     SOLVED, "16 - 4\\pi", None, "R1 distill: inline maths box on the line after the keyword"),
    ("Okay, angle ABC is the unknown.\n</think>\n\nNEED MORE INFO\nWhat is the measure of angle ABC in the figure?",
     ASK, "What is the measure of angle ABC in the figure?", None, "R1-Distill-Llama: plain ask"),
    ("Okay, I know AB and BC but not the angle between them.\n</think>\n\nThe description gives the lengths of AB "
     "and BC but not the angle between them, so I can't find AC.\n\nNEED MORE INFO\nWhat is the measure of angle B?",
     ASK, "What is the measure of angle B?", None, "R1 distill: explanation before the keyword"),
    ("Hmm, two circles, only one radius.\n</think>\n\nNEED MORE INFO: What is the radius of the larger circle?",
     ASK, "What is the radius of the larger circle?", None, "R1 distill: question on the keyword's line"),
    ("Okay, so it's an equilateral triangle with side 1, and the height is sqrt(3)/2.\n</think>\n\nSOLVED\n\n"
     "The height of an equilateral triangle with side 1 is\n\\[\n\\boxed{\\dfrac{\\sqrt{3}}{2}}\n\\]",
     SOLVED, "\\dfrac{\\sqrt{3}}{2}", None, "R1 distill: nested braces in a display box"),
    ("Okay, 6 groups of 7.\n</think>\n\nSOLVED \\boxed{42}\n\n**Verification:** 6 \u00d7 7 = 42 \u2713\n\n\\boxed{42}",
     SOLVED, "42", None, "R1 distill: the answer repeated after a check"),
    ("Okay, the bars are 5 and 7.\n</think>\n\nSOLVED \\boxed{12}\n\nNote: if the bars are stacked rather than side "
     "by side, the total would be \\boxed{20}.",
     SOLVED, "12", "several_answers", "R1 distill: a second, hedged answer after the protocol answer"),
    ("Okay, 6 by 4.\n</think>\n\nThe area is \\(6 \\times 4 = 24\\), so the answer is \\(\\boxed{24}\\).\n\nSOLVED",
     SOLVED, "24", None, "R1 distill: the answer before the keyword"),
    ("Okay, the sum of the angles of a triangle.\n</think>\n\nSOLVED\n\nThe sum of the interior angles is "
     "\\boxed{180",
     BAD, "no_answer", None, "R1 distill truncated inside the box"),
    ("Okay, all sides are given.\n</think>\n\nThe description is sufficient (no NEED MORE INFO needed).\n\n"
     "SOLVED \\boxed{5}",
     SOLVED, "5", None, "R1 distill: a negated keyword before the decision"),

    # --- Qwen3 ---------------------------------------------------------------------------------------------------
    ("<think>\n\n</think>\n\nSOLVED  \n$$\n\\boxed{18}\n$$",
     SOLVED, "18", None, "Qwen3 enable_thinking=False: empty think block, $$ display"),
    ("<think>\nOkay, let me compute the area: 1/2 * 10 * 4 = 20.\n</think>\n\n### Step 1: Identify the given values\n"
     "- Base = 10\n- Height = 4\n\n### Step 2: Compute the area\n$$\n\\text{Area} = \\frac{1}{2} \\times 10 \\times 4 "
     "= 20\n$$\n\n---\n\n### \u2705 Final Answer:\n**SOLVED** \\boxed{20}",
     SOLVED, "20", None, "Qwen3 thinking: headers, rules, the decision under the final header"),
    ("<think>\n\n</think>\n\n**NEED MORE INFO**\n\nThe description does not specify the length of side $ BC $.\n\n"
     "**Question:** What is the length of side $ BC $?",
     ASK, "What is the length of side $ BC $?", None, "Qwen3: bold keyword, bold Question label"),
    ("<think>\n\n</think>\n\n### NEED MORE INFO\n\nWhat is the value of the angle marked $ x $ in the diagram?",
     ASK, "What is the value of the angle marked $ x $ in the diagram?", None, "Qwen3: keyword as a header"),
    ("<think>\n\n</think>\n\nSOLVED \\boxed{7}\n\n---\n\nLet me know if you need more information or further "
     "clarification!",
     SOLVED, "7", None, "Qwen3: polite tail after a rule"),
    ("<think>\nThe red sector is 9 of 36 parts... so the answer should be SOLVED with 9.\n</think>\n\n"
     "SOLVED \\boxed{9}",
     SOLVED, "9", None, "Qwen3 thinking: keyword in the reasoning and in the answer"),
    ("<think>\n\n</think>\n\nNEED MORE INFO\n\n1. What are the heights of the bars labeled 2019 and 2020?\n"
     "2. Is the y-axis in thousands?",
     ASK, "What are the heights of the bars labeled 2019 and 2020?", None, "Qwen3: enumerated questions"),
    ("<think>\n\n</think>\n\nNEED MORE INFO  \n- What is the diameter of the semicircle?",
     ASK, "What is the diameter of the semicircle?", None, "Qwen3: bulleted question"),
    ("<think>\nThe description lists every side, so I can add them: 3 + 4 + 5 = 12.\n</think>\n\nSince all three "
     "sides are given, I don't need more information.\n\n**SOLVED**: $\\boxed{12}$",
     SOLVED, "12", None, "Qwen3: negation in prose, bold keyword with colon"),

    # --- Qwen2.5 instruct ------------------------------------------------------------------------------------------
    ("To determine the total number of apples, we add the values of the two bars:\n\n\\[\n5 + 7 = 12\n\\]\n\n"
     "SOLVED \\(\\boxed{12}\\)",
     SOLVED, "12", None, "Qwen2.5: \\[ \\] working, box inside \\( \\)"),
    ("Based on the description, I need to decide whether to reply with SOLVED or NEED MORE INFO. The description "
     "provides the base (8) and the height (5) of the triangle, so:\n\nSOLVED \\(\\boxed{20}\\)",
     SOLVED, "20", None, "Qwen2.5: a preamble naming both options"),
    ("NEED MORE INFO\nCould you please tell me the length of the rectangle's longer side?",
     ASK, "Could you please tell me the length of the rectangle's longer side?", None, "Qwen2.5: polite question"),
    ("SOLVED \\(\\boxed{16}\\)\n\nThe square has side 4, so its area is \\(4^2 = 16\\). If you have any further "
     "questions or need more information, feel free to ask!",
     SOLVED, "16", None, "Qwen2.5: the usual closing offer"),
    ("SOLVED\n\nThe final answer is \\(\\boxed{45^\\circ}\\).",
     SOLVED, "45^\\circ", None, "Qwen2.5: 'The final answer is' with a box"),
    ("The problem can be solved using the Pythagorean theorem: \\(\\sqrt{5^2 + 12^2} = 13\\). Thus, the hypotenuse "
     "is \\(\\boxed{13}\\).\n\nSOLVED",
     SOLVED, "13", None, "Qwen2.5: 'can be solved' in prose, keyword last"),
    ("This problem cannot be solved without knowing the radius.\n\nNEED MORE INFO\nWhat is the radius of the "
     "circle?",
     ASK, "What is the radius of the circle?", None, "Qwen2.5: 'cannot be solved' in prose before an ask"),
    ("To find the probability, we count the favourable outcomes: 3 of the 8 marbles are red, so the probability is "
     "\\(\\frac{3}{8}\\).\n\nSOLVED \\boxed{\\frac{3}{8}}",
     SOLVED, "\\frac{3}{8}", None, "Qwen2.5: working then the protocol line"),
    ("SOLVED \\boxed{9}\n\nThe answer is \\boxed{9}.",
     SOLVED, "9", None, "Qwen2.5: the answer repeated"),
    ("To determine the number of students who chose soccer, we need the height of the soccer bar. The description "
     "does not mention it.\n\nNEED MORE INFO\nWhat is the height of the soccer bar?\n\nOnce I have this "
     "information, I can solve the problem.",
     ASK, "What is the height of the soccer bar?", None, "Qwen2.5: ask with a closing remark"),
    ("The area is \\(\\boxed{50}\\).",
     SOLVED, "50", "no_keyword", "Qwen2.5-Math: a bare box, no keyword"),

    # --- Llama-3.x instruct --------------------------------------------------------------------------------------
    ("## Step 1: Identify the heights of the bars\nThe red bar is 7 and the blue bar is 3.\n\n## Step 2: Compute the "
     "difference\n7 - 3 = 4\n\nThe final answer is: $\\boxed{4}$\n\nSOLVED",
     SOLVED, "4", None, "Llama-3.1: step headers, answer, keyword last"),
    ("SOLVED\n\n## Step 1: Recall the formula for the area of a square\nThe area is the side squared.\n\n## Step 2: "
     "Apply it\n5^2 = 25\n\nTherefore, the final answer is: $\\boxed{25}$. I hope it is correct.",
     SOLVED, "25", None, "Llama-3.1 evaluation format after the keyword"),
    ("## Step 1: Find the number of cookies per tray\nEach tray holds 6 cookies.\n\n## Step 2: Multiply by the "
     "number of trays\n6 \u00d7 5 = 30\n\nTherefore, the final answer is: $\\boxed{30}$. I hope it is correct.",
     SOLVED, "30", "no_keyword", "Llama-3.1 evaluation format ignoring the protocol"),
    ("I need more information to solve this problem. NEED MORE INFO\nWhat is the length of the hypotenuse in the "
     "right triangle?",
     ASK, "What is the length of the hypotenuse in the right triangle?", None, "Llama-3: paraphrase then keyword"),
    ("NEED MORE INFO\nWhat is the scale of the y-axis?\n\nWithout this information, I cannot determine the exact "
     "value. However, if each gridline is 10, the answer would be $\\boxed{50}$.",
     ASK, "What is the scale of the y-axis?", "both_decisions", "Llama-3: ask plus a hedged guess"),
    ("**Answer:** SOLVED $\\boxed{12}$",
     SOLVED, "12", None, "Llama-3: bold label"),
    ("Based on the description, the answer is SOLVED \\boxed{8}",
     SOLVED, "8", None, "Llama-3.2 3B: keyword mid-sentence"),
    ("I don't need more information. The answer is:\n\nSOLVED \\boxed{64}",
     SOLVED, "64", None, "Llama-3: negation before the decision"),
    ("## Step 1: Determine what is given\nThe description gives the radius of the circle as 3.\n\n## Step 2: "
     "Calculate the circumference\nC = 2\u03c0r = 6\u03c0\n\nThe final answer is: SOLVED $\\boxed{6\\pi}$",
     SOLVED, "6\\pi", None, "Llama-3.1: keyword on the final-answer line"),
    ("SOLVED\n\nFinal Answer: The final answer is $32$. I hope it is correct.",
     SOLVED, "32", None, "Minerva-style final line (Llama evals)"),
    ("NEED MORE INFO\n\nTo calculate the volume of the cylinder, I need to know its height.\n\nWhat is the height of "
     "the cylinder?",
     ASK, "What is the height of the cylinder?", None, "Llama-3: explanation line before the question"),

    # --- SmolLM2 and other small instruct models -------------------------------------------------------------------
    ("SOLVED \\boxed{10}\n\nSOLVED \\boxed{10}",
     SOLVED, "10", None, "SmolLM2-1.7B: the whole answer repeated"),
    ("NEED MORE INFO\nWhat is the height of the tree? What is the length of the shadow?",
     ASK, "What is the height of the tree?", None, "SmolLM2: two questions on one line"),
    ("solved \\boxed{6}",
     SOLVED, "6", None, "SmolLM2-360M: lowercase keyword"),
    ("need more info\nhow many red squares are there?",
     ASK, "how many red squares are there?", None, "SmolLM2-360M: lowercase ask"),
    ("SOLVED \\boxed{3",
     BAD, "no_answer", None, "SmolLM2: truncated box"),
    ("NEED MORE INFO\nWhat is the length of the",
     ASK, "What is the length of the", None, "SmolLM2: truncated question (still asked)"),
    ("NEED MORE INFO",
     BAD, "ask_without_question", None, "SmolLM2: keyword alone"),
    ("SOLVED",
     BAD, "no_answer", None, "SmolLM2: keyword alone"),
    ("NEED MORE INFO\nWhat is the radius?\nNEED MORE INFO\nWhat is the radius?",
     ASK, "What is the radius?", None, "SmolLM2: the ask repeated"),
    ("SOLVED\nNEED MORE INFO\nWhat is the width of the rectangle?",
     ASK, "What is the width of the rectangle?", "both_decisions", "SmolLM2: both keywords, only the ask has content"),
    ("Sure! Here's my answer:\n\nSOLVED \\boxed{14}",
     SOLVED, "14", None, "SmolLM2: chatty preamble"),
    ("The image shows a triangle. The triangle has three sides. The triangle is a shape.",
     BAD, "no_decision", None, "SmolLM2-135M: rambling"),
    ("If the description gives you everything you need, solve the problem and reply with SOLVED followed by the "
     "final answer in \\boxed{}.",
     BAD, "no_decision", None, "SmolLM2-135M: echoes the instruction (a conditional sentence)"),
    ("The answer is 12.",
     BAD, "no_decision", None, "Qwen2.5-0.5B: answer phrase without keyword or box"),
    ("SOLVED: \\boxed{-3}",
     SOLVED, "-3", None, "Qwen2.5-0.5B: colon after the keyword"),

    # --- Gemma -----------------------------------------------------------------------------------------------------
    ("**SOLVED**\n\n**Explanation:**\n\n* The rectangle has length 8 and width 3.\n* Area = length \u00d7 width = "
     "8 \u00d7 3 = 24\n\n**Answer:** \\boxed{24}",
     SOLVED, "24", None, "Gemma-2: bold sections, bullets"),
    ("**NEED MORE INFO**\n\n**Question:** What is the measure of angle *x*?",
     ASK, "What is the measure of angle *x*?", None, "Gemma-2: bold keyword and label"),
    ("**Decision:** NEED MORE INFO\n\n**Clarifying question:** How many rows of seats are shown in the picture?",
     ASK, "How many rows of seats are shown in the picture?", None, "Gemma-2: labelled decision and question"),
    ("SOLVED \\boxed{11}\n\nLet me know if you have any other questions!",
     SOLVED, "11", None, "Gemma: closing offer"),
    ("Here's the solution:\n\n**SOLVED** $\\boxed{5}$\n\nThe description states the square has a side of 5 units.",
     SOLVED, "5", None, "Gemma-3: preamble, bold keyword, explanation after"),
    ("I need more information to answer this.\n\n**NEED MORE INFO**\n\n* What is the length of the shorter leg?",
     ASK, "What is the length of the shorter leg?", None, "Gemma: paraphrase, bold keyword, bullet"),
    ("**Solved!**\n\nThe pie chart has 4 equal slices, so each is 25%.\n\n**Answer:** $\\boxed{25\\%}$",
     SOLVED, "25\\%", None, "Gemma: title-case keyword with exclamation"),

    ("**Decision: SOLVED**\n\n**Final answer:** \\boxed{14}",
     SOLVED, "14", None, "Gemma-3: bold decision line, bold final-answer label"),
    ("## Decision\nSOLVED\n\n## Answer\n\\boxed{19}",
     SOLVED, "19", None, "Qwen3: decision and answer under headers"),
    ("**NEED MORE INFO:** What is the length of the side labeled *a*?",
     ASK, "What is the length of the side labeled *a*?", None, "Gemma: bold keyword with colon, question inline"),
    ("Response: NEED MORE INFO\nClarification question: What is the angle between the two lines?",
     ASK, "What is the angle between the two lines?", None, "Llama-3: labelled response and question"),
    ("SOLVED \\boxed{12 \\text{ cm}^2}",
     SOLVED, "12 \\text{ cm}^2", None, "Qwen2.5: units inside the box"),

    # --- negations, conditionals, questions about the keyword ------------------------------------------------------
    ("No need for more information: SOLVED \\boxed{10}",
     SOLVED, "10", None, "negation: 'No need for more information'"),
    ("NEED MORE INFO? No \u2014 the description gives every length.\n\nSOLVED \\boxed{30}",
     SOLVED, "30", None, "a keyword asked about, then answered"),
    ("The problem is NOT SOLVED yet: NEED MORE INFO\nWhat is the height of the cylinder?",
     ASK, "What is the height of the cylinder?", None, "negated SOLVED before an ask"),
    ("Rather than NEED MORE INFO, the description is complete, so SOLVED \\boxed{4}.",
     SOLVED, "4", None, "'rather than' keyword"),
    ("I do NOT NEED MORE INFO.\nSOLVED \\boxed{2}",
     SOLVED, "2", None, "capitalised negation"),
    ("SOLVED \\boxed{10}\n\nIf you need more info, let me know.",
     SOLVED, "10", None, "polite tail (the reported bug)"),
    ("SOLVED \\boxed{3.5}\n\nIf anything in the description is wrong, I would NEED MORE INFO about the scale.",
     SOLVED, "3.5", None, "conditional keyword in the tail"),
    ("NEED MORE INFO\nWhat is the length of the base?\n\nOnce I have it, I'll reply SOLVED with the area.",
     ASK, "What is the length of the base?", "both_decisions", "ask with a promise to solve"),
    ("I should answer with SOLVED or NEED MORE INFO. Since the chart shows all values:\n\nSOLVED \\boxed{27}",
     SOLVED, "27", None, "options named together in a preamble"),
    ("The problem remains unsolved: NEED MORE INFO\nWhat is the diagonal of the square?",
     ASK, "What is the diagonal of the square?", None, "'unsolved' is not the keyword"),
    ("NEED MORE INFO\nHow many problems has Tom solved, according to the bar for Monday?",
     ASK, "How many problems has Tom solved, according to the bar for Monday?", None, "'solved' inside the question"),
    ("Not enough information is given. NEED MORE INFO\nWhat is the height of the blue bar?",
     ASK, "What is the height of the blue bar?", None, "negation in the sentence before the keyword"),
    ("I cannot determine the answer without the height, so NEED MORE INFO\nWhat is the height of the blue bar?",
     ASK, "What is the height of the blue bar?", None, "'cannot ... without' earlier in the sentence"),
    ("SOLVED \\boxed{10}. If you NEED MORE INFO, let me know.",
     SOLVED, "10", None, "capitalised keyword in a conditional tail"),
    ("I have enough information, so I don't need to ask NEED MORE INFO.\n\nSOLVED \\boxed{9}",
     SOLVED, "9", "both_decisions", "negation too far from the keyword: read as an empty ask, the answer wins"),
    ("Everything needed is given. Solved: \\boxed{81}",
     SOLVED, "81", None, "keyword opening a sentence"),

    # --- both decisions ---------------------------------------------------------------------------------------------
    ("NEED MORE INFO\nWhat is the height of the red bar?\n\nSOLVED \\boxed{7}",
     ASK, "What is the height of the red bar?", "both_decisions", "ask followed by an answer"),
    ("SOLVED \\boxed{6}\nNEED MORE INFO\nIs the triangle isosceles?",
     SOLVED, "6", "both_decisions", "answer followed by an ask"),
    ("I think \\boxed{4} but NEED MORE INFO\n- what is the height of the green bar ?",
     ASK, "what is the height of the green bar ?", "both_decisions", "tentative box, then an ask"),
    ("NEED MORE INFO\nSOLVED \\boxed{5}",
     SOLVED, "5", "both_decisions", "an empty ask, then an answer"),

    # --- where the question sits and how it is marked ---------------------------------------------------------------
    ("NEED MORE INFO \u2014 what is the value of the largest sector in the pie chart?",
     ASK, "what is the value of the largest sector in the pie chart?", None, "dash after the keyword"),
    ("NEED MORE INFO\n\nThe description mentions two circles but not their radii.\n\nWhat are the radii of the two "
     "circles?",
     ASK, "What are the radii of the two circles?", None, "statement line, then the question"),
    ("NEED MORE INFO. The description does not state the height. What is the height of the trapezoid?",
     ASK, "What is the height of the trapezoid?", None, "explanation and question on the keyword's line"),
    ("NEED MORE INFO\nQuestion: \"How long is side AB?\"",
     ASK, "How long is side AB?", None, "quoted question with a label"),
    ("NEED MORE INFO\nQ: What is the value of x in the figure?",
     ASK, "What is the value of x in the figure?", None, "Q: label"),
    ("NEED MORE INFO\n> What is the length of the ladder?",
     ASK, "What is the length of the ladder?", None, "quoted-block marker"),
    ("NEED MORE INFO\nPlease provide the number of students in each group.",
     ASK, "Please provide the number of students in each group.", None, "an imperative request, no '?'"),
    ("NEED MORE INFORMATION\nWhat is the side length of the square?",
     ASK, "What is the side length of the square?", None, "INFORMATION spelled out"),
    ("Need more info: what is the unit of the y-axis?",
     ASK, "what is the unit of the y-axis?", None, "title case, question after a colon"),
    ("NEED MORE INFO\nSo please provide: what is the price of the first glass?",
     ASK, "So please provide: what is the price of the first glass?", None, "GSM-MC asking style"),
    ("NEED MORE INFO\nWhat is the radius? And is the angle at the center 60 degrees?",
     ASK, "What is the radius?", None, "two questions on one line"),
    ("NEED MORE INFO\n**1. What is the length of side AC?**\n**2. What is angle C?**",
     ASK, "What is the length of side AC?", None, "bold enumerated questions"),
    ("NEED_MORE_INFO\nWhat is the height of the prism?",
     ASK, "What is the height of the prism?", None, "keyword with underscores"),

    # --- answers: restated, nested, truncated ------------------------------------------------------------------------
    ("SOLVED \\boxed{48}\n\nFinal answer: 48",
     SOLVED, "48", None, "answer restated after 'Final answer:'"),
    ("SOLVED\nFinal answer: 3/4",
     SOLVED, "3/4", None, "no box, 'Final answer:' line"),
    ("SOLVED \\boxed{\\frac{\\sqrt{2}}{2}}",
     SOLVED, "\\frac{\\sqrt{2}}{2}", None, "nested braces"),
    ("SOLVED \\boxed{\\text{(B)}}",
     SOLVED, "\\text{(B)}", None, "multiple choice in \\text"),
    ("**SOLVED** \\(\\boxed{2\\sqrt{5}}\\)",
     SOLVED, "2\\sqrt{5}", None, "bold keyword, radical"),
    ("SOLVED \\boxed{C}",
     SOLVED, "C", None, "option letter"),
    ("SOLVED\n\nFirst, the area of the rectangle is 6 \u00d7 4 = 24. Then the triangle has area",
     BAD, "no_answer", None, "truncated before the answer"),
    ("NEED MORE INFO\n",
     BAD, "ask_without_question", None, "truncated after the keyword"),
    ("",
     BAD, "empty", None, "empty completion"),
]


@pytest.mark.parametrize("text,kind,expected,ambiguous,style", CORPUS, ids=[c[4] for c in CORPUS])
def test_reply_corpus(text, kind, expected, ambiguous, style):
    r = parse_reply(text)
    got = {"solved": r.answer, "ask": r.question, "malformed": r.reason}[r.kind]
    assert (r.kind, got, r.ambiguous) == (kind, expected, ambiguous), style


def test_corpus_size_and_spread():
    kinds = Counter(c[1] for c in CORPUS)
    assert len(CORPUS) >= 60 and min(kinds.values()) >= 10, kinds
    assert sum(c[3] is not None for c in CORPUS) >= 8     # the ambiguous rules are exercised, not just documented


@pytest.mark.parametrize("text,kind,field", [
    ("SOLVED \\boxed{7}", "solved", "7"),
    ("solved.\n\nThe answer is \\boxed{\\frac{1}{2}}", "solved", "\\frac{1}{2}"),
    ("<think>maybe NEED MORE INFO? no.</think>\nSOLVED \\boxed{3}", "solved", "3"),
    ("<think>I have all I need</think>NEED MORE INFO\nWhat is the width of the rectangle?", "ask",
     "What is the width of the rectangle?"),
    ("  Need More Information:  how many blue shapes are there?  ", "ask", "how many blue shapes are there?"),
    ("NEED MORE INFO\nQuestion: What is the base of the triangle?\nThanks", "ask", "What is the base of the triangle?"),
    ("I think \\boxed{4} but NEED MORE INFO\n- what is the height of the green bar ?", "ask",
     "what is the height of the green bar ?"),
    ("NEED MORE INFO", "malformed", "ask_without_question"),
    ("SOLVED", "malformed", "no_answer"),
    ("", "malformed", "empty"),
    ("<think>still thinking about the bars", "malformed", "only_thinking"),
    ("The figure is nice.", "malformed", "no_decision"),
])
def test_parse_reply(text, kind, field):
    r = parse_reply(text)
    assert r.kind == kind
    assert {"solved": r.answer, "ask": r.question, "malformed": r.reason}[kind] == field


@pytest.mark.parametrize("text,kind,field", [
    # a polite tail used to turn an answer into a clarification request with the question ", let me know."
    ("SOLVED \\boxed{10}\n\nIf you need more info, let me know.", "solved", "10"),
    ("SOLVED \\boxed{10}. Let me know if you need more information!", "solved", "10"),
    # an enumerated ask used to keep its "1. " prefix
    ("NEED MORE INFO\n1. What is the radius of the circle?\n2. Is AB a diameter?", "ask",
     "What is the radius of the circle?"),
    # a negated keyword is not a decision
    ("SOLVED \\boxed{12}\n\nI don't NEED MORE INFO: the caption gives both sides.", "solved", "12"),
])
def test_parse_reply_reads_the_decision_not_the_tail(text, kind, field):
    r = parse_reply(text)
    assert (r.kind, r.answer if kind == "solved" else r.question) == (kind, field)
