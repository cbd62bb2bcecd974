"""The `medcalc` built task: medcalc-bench's calculators on sampled patient notes.

Each calculator in ``MEDCALC_CALCULATORS`` samples a patient; ``medcalc_example`` writes the
note, the question, the calculator's own explanation as the solution and its result as the
answer, with the calculator's output type (integer or decimal: how the answer is scored).
"""
from __future__ import annotations

import copy
import importlib
import random
import re
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Tuple

from nemo_anchored.data.task_format import chat_example

# A fact of a sampled note: the calculator inputs it sets and the line of the note stating them.
Fact = Tuple[dict, str]


@dataclass(frozen=True)
class Calculator:
    """One medcalc-bench calculator and how to sample a patient it applies to.

    ``sample(rng, patient)`` returns the facts of the note (every input the calculator reads,
    stated in the note); ``patient`` holds the age (years) and sex every note starts with.
    """

    name: str
    function: str  # "module.function" inside the medcalc package
    output: str  # "integer" (scored exactly) or "decimal" (relative tolerance)
    question: str
    sample: Callable[[random.Random, dict], List[Fact]]

    def compute(self, inputs: dict) -> dict:
        """The calculator's {"Explanation": str, "Answer": number} for ``inputs``."""
        module, function = self.function.rsplit(".", 1)
        calculate = getattr(importlib.import_module(f"medcalc.{module}"), function)
        return calculate(copy.deepcopy(inputs))  # some calculators fill in defaults in place


def _uniform(rng: random.Random, low: float, high: float, digits: int = 1) -> float:
    return round(rng.uniform(low, high), digits)


def _lab(rng, key: str, label: str, low: float, high: float, unit: str, digits: int = 0) -> Fact:
    value = float(round(rng.uniform(low, high), digits))
    return {key: (value, unit)}, f"{label}: {value:g} {unit}."


def _flags(rng: random.Random, flags: Dict[str, str], p: float = 0.3) -> List[Fact]:
    """Yes/no findings, each stated in the note whether present or absent."""
    facts = []
    for key, label in flags.items():
        value = rng.random() < p
        facts.append(({key: value}, f"{label}: {'yes' if value else 'no'}."))
    return facts


def _age(patient) -> Fact:
    return {"age": (patient["age"], "years")}, f"Age: {patient['age']} years."


def _sex(patient) -> Fact:
    return {"sex": patient["sex"]}, f"Sex: {patient['sex'].lower()}."


def _weight(rng, patient) -> Fact:
    kg = _uniform(rng, 50, 110) if patient["sex"] == "Male" else _uniform(rng, 42, 95)
    if rng.random() < 0.3:  # the calculators convert pounds themselves
        lbs = round(kg * 2.20462, 1)
        return {"weight": (lbs, "lbs")}, f"Weight: {lbs} lbs."
    return {"weight": (kg, "kg")}, f"Weight: {kg} kg."


def _height(rng, patient) -> Fact:
    cm = _uniform(rng, 160, 195) if patient["sex"] == "Male" else _uniform(rng, 148, 182)
    if rng.random() < 0.3:
        inches = round(cm / 2.54)
        return {"height": (inches, "in")}, f"Height: {inches} in."
    return {"height": (cm, "cm")}, f"Height: {cm} cm."


def _electrolytes(rng, albumin: bool = False) -> List[Fact]:
    facts = [_lab(rng, "sodium", "Sodium", 125, 150, "mmol/L"),
             _lab(rng, "chloride", "Chloride", 88, 115, "mmol/L"),
             _lab(rng, "bicarbonate", "Bicarbonate", 10, 32, "mmol/L")]
    if albumin:
        facts.append(_lab(rng, "albumin", "Albumin", 1.5, 5.0, "g/dL", 1))
    return facts


def _creatinine(rng, high: float = 4.0) -> Fact:
    return _lab(rng, "creatinine", "Serum creatinine", 0.5, high, "mg/dL", 2)


def _blood_pressure(rng) -> Fact:
    systolic = float(rng.randint(80, 190))
    diastolic = float(rng.randint(40, int(systolic) - 20))
    return ({"sys_bp": (systolic, "mm hg"), "dia_bp": (diastolic, "mm hg")},
            f"Blood pressure: {systolic:g}/{diastolic:g} mm Hg.")


def _temperature(rng) -> Fact:
    celsius = _uniform(rng, 36.0, 40.0)
    if rng.random() < 0.4:
        fahrenheit = round(celsius * 9 / 5 + 32, 1)
        return ({"temperature": (fahrenheit, "degrees fahrenheit")},
                f"Temperature: {fahrenheit} degrees fahrenheit.")
    return ({"temperature": (celsius, "degrees celsius")},
            f"Temperature: {celsius} degrees celsius.")


def _platelets(rng) -> Fact:
    per_microliter = float(rng.randint(50, 450) * 1000)
    return ({"platelet_count": (per_microliter, "µL")},
            f"Platelet count: {per_microliter:g} per µL.")


def _qt(rng, patient) -> List[Fact]:
    return [_lab(rng, "heart_rate", "Heart rate", 45, 150, "beats per minute"),
            _lab(rng, "qt_interval", "QT interval", 300, 500, "msec")]


_GLASGOW = {
    "best_eye_response": ("Best eye response", (
        "eyes open spontaneously", "eye opening to verbal command", "eye opening to pain",
        "no eye opening")),
    "best_verbal_response": ("Best verbal response", (
        "oriented", "confused", "inappropriate words", "incomprehensible sounds",
        "no verbal response")),
    "best_motor_response": ("Best motor response", (
        "obeys commands", "localizes pain", "withdrawal from pain", "flexion to pain",
        "extension to pain", "no motor response")),
}


def _glasgow(rng, patient) -> List[Fact]:
    facts = []
    for key, (label, options) in _GLASGOW.items():
        choice = rng.choice(options)
        facts.append(({key: choice}, f"{label}: {choice}."))
    return facts


def _has_bled(rng, patient) -> List[Fact]:
    drinks = rng.randint(0, 14)
    return [_age(patient), *_flags(rng, {
        "hypertension": "Uncontrolled hypertension", "renal_disease_has_bled": "Renal disease",
        "liver_disease_has_bled": "Liver disease", "stroke": "Prior stroke",
        "prior_bleeding": "Prior major bleeding or predisposition to bleeding",
        "labile_inr": "Labile INR",
        "medications_for_bleeding": "Medication predisposing to bleeding"}),
        ({"alcoholic_drinks": drinks}, f"Alcoholic drinks per week: {drinks}.")]


def _meld_na(rng, patient) -> List[Fact]:
    inr = _uniform(rng, 0.9, 4.0)
    return [_creatinine(rng), _lab(rng, "bilirubin", "Bilirubin", 0.3, 20.0, "mg/dL", 1),
            ({"inr": inr}, f"INR: {inr}."), _lab(rng, "sodium", "Sodium", 120, 145, "mmol/L"),
            *_flags(rng, {"dialysis_twice": "Dialysis at least twice in the past week",
                          "cvvhd": "Continuous veno-venous hemodialysis in the past week"},
                    0.15)]


_QT_FORMULAS = (
    ("bazett", "Bazett", "qt_calculator_bazett.bazett_calculator_explanation"),
    ("fridericia", "Fridericia", "qt_calculator_fredericia.fredericia_calculator_explanation"),
    ("framingham", "Framingham", "qt_calculator_framingham.framingham_calculator_explanation"),
    ("hodges", "Hodges", "qt_calculator_hodges.hodges_calculator_explanation"),
    ("rautaharju", "Rautaharju", "qt_calculator_rautaharju.rautaharju_calculator_explanation"),
)

# The calculators whose inputs can be sampled as plain measurements and yes/no findings (33 of
# the 55). Left out: those needing clinical judgement a sampled note would state badly (APACHE
# II, SOFA, PSI, Caprini, Charlson, Child-Pugh, HEART, Framingham risk, Glasgow-Blatchford,
# FeverPAIN, PERC, SIRS, RCRI, Wells DVT), dates (due date, conception, gestational age), dose
# conversions (MME, steroids), and target weight (its module fails to import in medcalc-bench
# 1.7.0). Output types follow MedCalc-Bench: the scores are integers,
# everything else (Wells' PE included: it counts in halves) decimal.
MEDCALC_CALCULATORS: Tuple[Calculator, ...] = (
    Calculator("bmi", "bmi_calculator.bmi_calculator_explanation", "decimal",
               "What is the patient's body mass index (BMI) in kg/m^2?",
               lambda rng, p: [_weight(rng, p), _height(rng, p)]),
    Calculator("body_surface_area", "bsa_calculator.bsa_calculator_explaination", "decimal",
               "What is the patient's body surface area in m^2?",
               lambda rng, p: [_weight(rng, p), _height(rng, p)]),
    Calculator("mean_arterial_pressure",
               "mean_arterial_pressure.mean_arterial_pressure_explanation", "decimal",
               "What is the patient's mean arterial pressure in mm Hg?",
               lambda rng, p: [_blood_pressure(rng)]),
    Calculator("anion_gap", "anion_gap.compute_anion_gap_explanation", "decimal",
               "What is the patient's anion gap in mEq/L?",
               lambda rng, p: _electrolytes(rng)),
    Calculator("delta_gap", "delta_gap.compute_delta_gap_explanation", "decimal",
               "What is the patient's delta gap in mEq/L?",
               lambda rng, p: _electrolytes(rng)),
    Calculator("albumin_corrected_anion_gap",
               "albumin_corrected_anion.compute_albumin_corrected_anion_explanation", "decimal",
               "What is the patient's albumin corrected anion gap in mEq/L?",
               lambda rng, p: _electrolytes(rng, albumin=True)),
    Calculator("albumin_corrected_delta_gap",
               "albumin_corrected_delta_gap.compute_albumin_corrected_delta_gap_explanation",
               "decimal", "What is the patient's albumin corrected delta gap in mEq/L?",
               lambda rng, p: _electrolytes(rng, albumin=True)),
    Calculator("calcium_correction",
               "calcium_correction.calculate_corrected_calcium_explanation", "decimal",
               "Using the calcium correction for hypoalbuminemia with a normal albumin of "
               "4 g/dL, what is the patient's corrected calcium in mg/dL?",
               lambda rng, p: [_lab(rng, "albumin", "Albumin", 1.5, 5.0, "g/dL", 1),
                               _lab(rng, "calcium", "Calcium", 6.5, 11.5, "mg/dL", 1)]),
    Calculator("ideal_body_weight", "ideal_body_weight.ibw_explanation", "decimal",
               "What is the patient's ideal body weight in kg?",
               lambda rng, p: [_height(rng, p), _sex(p)]),
    Calculator("adjusted_body_weight", "adjusted_body_weight.abw_explanation", "decimal",
               "What is the patient's adjusted body weight in kg?",
               lambda rng, p: [_weight(rng, p), _height(rng, p), _sex(p)]),
    Calculator("ldl_cholesterol", "ldl_calculated.compute_ldl_explanation", "decimal",
               "What is the patient's calculated LDL cholesterol in mg/dL?",
               lambda rng, p: [_lab(rng, "total_cholestrol", "Total cholesterol", 150, 300,
                                    "mg/dL"),
                               _lab(rng, "hdl_cholestrol", "HDL cholesterol", 25, 80, "mg/dL"),
                               _lab(rng, "triglycerides", "Triglycerides", 50, 350, "mg/dL")]),
    Calculator("serum_osmolality", "sOsm.compute_serum_osmolality_explanation", "decimal",
               "What is the patient's calculated serum osmolality in mOsm/kg?",
               lambda rng, p: [_lab(rng, "bun", "BUN", 5, 60, "mg/dL"),
                               _lab(rng, "glucose", "Glucose", 70, 600, "mg/dL"),
                               _lab(rng, "sodium", "Sodium", 125, 155, "mmol/L")]),
    *[Calculator(f"qtc_{key}", function, "decimal",
                 f"Using the {label} formula, what is the patient's corrected QT interval in "
                 "msec?", _qt) for key, label, function in _QT_FORMULAS],
    Calculator("free_water_deficit", "free_water_deficit.free_water_deficit_explanation",
               "decimal", "What is the patient's free water deficit in liters?",
               lambda rng, p: [_age(p), _sex(p), _weight(rng, p),
                               _lab(rng, "sodium", "Sodium", 146, 170, "mmol/L")]),
    Calculator("creatinine_clearance",
               "creatinine_clearance.generate_cockcroft_gault_explanation", "decimal",
               "Using the Cockcroft-Gault equation (with the weight adjustment for BMI), what "
               "is the patient's creatinine clearance in mL/min?",
               lambda rng, p: [_age(p), _sex(p), _weight(rng, p), _height(rng, p),
                               _creatinine(rng)]),
    Calculator("ckd_epi_2021", "ckd_epi_2021_creatinine.ckd_epi_2021_explanation", "decimal",
               "Using the 2021 CKD-EPI creatinine equation, what is the patient's GFR in "
               "mL/min/1.73 m^2?", lambda rng, p: [_age(p), _sex(p), _creatinine(rng)]),
    Calculator("mdrd_gfr", "mdrd_gfr.mrdr_gfr_explanation", "decimal",
               "Using the MDRD equation, what is the patient's GFR in mL/min/1.73 m^2?",
               lambda rng, p: [_age(p), _sex(p), _creatinine(rng)]),
    Calculator("fena", "compute_fena.compute_fena_explanation", "decimal",
               "What is the patient's fractional excretion of sodium (FENa) in percent?",
               lambda rng, p: [_lab(rng, "sodium", "Serum sodium", 125, 150, "mmol/L"),
                               _creatinine(rng, 6.0),
                               _lab(rng, "urine_sodium", "Urine sodium", 5, 150, "mmol/L"),
                               _lab(rng, "urine_creatinine", "Urine creatinine", 20, 250,
                                    "mg/dL")]),
    Calculator("homa_ir", "homa_ir.compute_homa_ir_explanation", "decimal",
               "What is the patient's HOMA-IR score?",
               lambda rng, p: [_lab(rng, "insulin", "Fasting insulin", 2, 40, "µIU/mL", 1),
                               _lab(rng, "glucose", "Fasting glucose", 70, 250, "mg/dL")]),
    Calculator("maintenance_fluids", "maintenance_fluid_calc.maintenance_fluid_explanation",
               "decimal", "Using the 4-2-1 rule, what is the patient's maintenance fluid rate "
               "in mL/hr?", lambda rng, p: [_weight(rng, p)]),
    Calculator("fib4", "fibrosis_4.compute_fib4_explanation", "decimal",
               "What is the patient's Fibrosis-4 (FIB-4) index?",
               lambda rng, p: [_age(p), _lab(rng, "ast", "AST", 10, 300, "U/L"),
                               _lab(rng, "alt", "ALT", 10, 300, "U/L"), _platelets(rng)]),
    Calculator("sodium_correction_hyperglycemia",
               "sch.compute_sodium_correction_hyperglycemia_explanation", "decimal",
               "What is the patient's sodium corrected for hyperglycemia in mEq/L?",
               lambda rng, p: [_lab(rng, "glucose", "Glucose", 100, 800, "mg/dL"),
                               _lab(rng, "sodium", "Sodium", 120, 145, "mmol/L")]),
    Calculator("meld_na", "meldna.compute_meldna_explanation", "decimal",
               "What is the patient's MELD Na score?", _meld_na),
    Calculator("wells_pe", "wells_criteria_pe.calculate_pe_wells_explanation", "decimal",
               "What is the patient's score of Wells' criteria for pulmonary embolism?",
               lambda rng, p: [
                   _lab(rng, "heart_rate", "Heart rate", 55, 140, "beats per minute"),
                   *_flags(rng, {"clinical_dvt": "Clinical signs and symptoms of DVT",
                                 "pe_number_one": "PE is the most likely diagnosis",
                                 "immobilization_for_3days": "Immobilization for at least 3 "
                                 "days", "surgery_in_past4weeks": "Surgery in the past 4 weeks",
                                 "previous_pe": "Previous PE", "previous_dvt": "Previous DVT",
                                 "hemoptysis": "Hemoptysis",
                                 "malignancy_with_treatment": "Malignancy with treatment "
                                 "within 6 months or palliative"})]),
    Calculator("centor", "centor_score.compute_centor_score_explanation", "integer",
               "What is the patient's Centor score?",
               lambda rng, p: [_age(p), _temperature(rng), *_flags(rng, {
                   "exudate_swelling_tonsils": "Exudate or swelling on tonsils",
                   "tender_lymph_nodes": "Tender or swollen anterior cervical lymph nodes",
                   "cough_absent": "Cough absent"}, 0.5)]),
    Calculator("curb_65", "curb_65.curb_65_explanation", "integer",
               "What is the patient's CURB-65 score?",
               lambda rng, p: [_age(p), _blood_pressure(rng),
                               _lab(rng, "respiratory_rate", "Respiratory rate", 12, 40,
                                    "breaths per minute"),
                               _lab(rng, "bun", "BUN", 5, 60, "mg/dL"),
                               *_flags(rng, {"confusion": "Confusion"})]),
    Calculator("cha2ds2_vasc", "cha2ds2_vasc_score.generate_cha2ds2_vasc_explanation",
               "integer", "What is the patient's CHA2DS2-VASc score?",
               lambda rng, p: [_age(p), _sex(p), *_flags(rng, {
                   "chf": "Congestive heart failure", "hypertension": "Hypertension",
                   "stroke": "Prior stroke", "tia": "Prior transient ischemic attack",
                   "thromboembolism": "Prior thromboembolism",
                   "vascular_disease": "Vascular disease (prior myocardial infarction, "
                   "peripheral artery disease or aortic plaque)",
                   "diabetes": "Diabetes mellitus"})]),
    Calculator("has_bled", "has_bled_score.compute_has_bled_score_explanation", "integer",
               "What is the patient's HAS-BLED score?", _has_bled),
    Calculator("glasgow_coma_scale",
               "glasgow_coma_score.compute_glasgow_coma_score_explanation", "integer",
               "What is the patient's Glasgow Coma Scale score?", _glasgow),
)


def _clean_explanation(text: str) -> str:
    """The calculators' explanations mix indented docstring text and literal "\\n"s."""
    lines = [line.strip() for line in text.replace("\\n", "\n").splitlines()]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def format_medcalc_answer(value, output: str) -> str:
    if output == "integer":
        if float(value) != round(float(value)):
            raise ValueError(f"integer calculator returned {value!r}")
        return str(int(round(float(value))))
    return repr(float(value))


def medcalc_example(calculator: Calculator, rng: random.Random) -> dict:
    """One sampled patient note, question and the calculator's worked answer."""
    patient = {"sex": rng.choice(("Male", "Female")), "age": rng.randint(18, 90)}
    facts = calculator.sample(rng, patient)
    inputs = {}
    for fact_inputs, _ in facts:
        inputs.update(fact_inputs)
    note = "\n".join([f"A {patient['age']}-year-old {patient['sex'].lower()} patient.",
                      *[line for _, line in facts]])
    result = calculator.compute(inputs)
    answer = format_medcalc_answer(result["Answer"], calculator.output)
    question = f"Patient note:\n{note}\n\nTask: {calculator.question}"
    return chat_example("medcalc", question, _clean_explanation(result["Explanation"]), answer,
                        "value", {"calculator": calculator.name, "output": calculator.output})


def medcalc_stream(seed: int, draws: int) -> Iterator[dict]:
    """Examples 0..draws-1 at ``seed``, each from its own (seed, index) generator: a prefix of
    a longer stream."""
    for index in range(draws):
        # A string seed is hashed deterministically (not subject to PYTHONHASHSEED).
        rng = random.Random(f"medcalc/{seed}/{index}")
        yield medcalc_example(rng.choice(MEDCALC_CALCULATORS), rng)
